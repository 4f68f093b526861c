{{/* The chart name (nameOverride replaces it). */}}
{{- define "capl.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The prefix of every resource name: fullnameOverride, else the release name when it already holds
the chart name, else `<release>-<chart>`. Kept to 40 characters so that the longest suffix
(`-webhook-configuration`) still fits in a label value.
*/}}
{{- define "capl.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "capl.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* `name-version` of the chart, for the helm.sh/chart label. */}}
{{- define "capl.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select the manager's pods (never change them: selectors are immutable). */}}
{{- define "capl.selectorLabels" -}}
app.kubernetes.io/name: {{ include "capl.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels on every object: the Cluster API provider label, the selector labels, and the standard ones. */}}
{{- define "capl.labels" -}}
cluster.x-k8s.io/provider: infrastructure-libvirt
{{ include "capl.selectorLabels" . }}
app.kubernetes.io/component: manager
app.kubernetes.io/part-of: cluster-api
{{- if .Values.standardLabels }}
helm.sh/chart: {{ include "capl.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}
{{- end -}}

{{- define "capl.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-manager" (include "capl.fullname" .)) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "capl.deploymentName" -}}
{{- printf "%s-controller-manager" (include "capl.fullname" .) -}}
{{- end -}}

{{/* The Service in front of the webhook (and metrics) ports. */}}
{{- define "capl.webhookServiceName" -}}
{{- printf "%s-webhook-service" (include "capl.fullname" .) -}}
{{- end -}}

{{/* The name of both webhook configurations (mutating and validating). */}}
{{- define "capl.webhookConfigurationName" -}}
{{- printf "%s-webhook-configuration" (include "capl.fullname" .) -}}
{{- end -}}

{{/* The Secret the manager keeps its own CA and serving certificate in (self-managed mode). */}}
{{- define "capl.webhookCertSecretName" -}}
{{- printf "%s-webhook-cert" (include "capl.fullname" .) -}}
{{- end -}}

{{/* The Secret cert-manager writes the serving certificate into (cert-manager mode). */}}
{{- define "capl.certManagerSecretName" -}}
{{- printf "%s-webhook-server-cert" (include "capl.fullname" .) -}}
{{- end -}}

{{/* The cert-manager Certificate of the serving certificate (named by the CA injection annotation). */}}
{{- define "capl.servingCertificateName" -}}
{{- printf "%s-serving-cert" (include "capl.fullname" .) -}}
{{- end -}}

{{- define "capl.leaseName" -}}
{{- default (printf "%s-controller-manager" (include "capl.fullname" .)) .Values.manager.leaderElection.id -}}
{{- end -}}

{{- define "capl.knownHostsConfigMapName" -}}
{{- default (printf "%s-known-hosts" (include "capl.fullname" .)) .Values.libvirt.knownHosts.existingConfigMap -}}
{{- end -}}

{{/* repository:tag, or repository@digest when a digest is set. */}}
{{- define "capl.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The annotation that makes cert-manager's cainjector fill caBundle (cert-manager mode). */}}
{{- define "capl.caInjection" -}}
{{- if .Values.certManager.enabled }}
annotations:
  cert-manager.io/inject-ca-from: {{ .Release.Namespace }}/{{ include "capl.servingCertificateName" . }}
{{- end }}
{{- end -}}
